"""What a user who installs lungseg meets: one version, the licence terms, both entry points."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import metadata, version
from pathlib import Path

import tomllib

import lungseg

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(Path(sys.executable).with_name("lungseg"))  # the console script of this venv


def test_one_version_string_everywhere():
    assert version("lungseg") == lungseg.__version__
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in pyproject and "version" in pyproject["dynamic"]
    for command in ([SCRIPT], [sys.executable, "-m", "lungseg"]):
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, check=True)
        assert done.stdout == f"lungseg {lungseg.__version__}\n"


def test_python_dash_m_lungseg_is_the_console_script():
    def help_of(*command: str) -> str:
        done = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True)
        return done.stdout.replace("__main__.py", "lungseg")

    assert help_of(sys.executable, "-m", "lungseg") == help_of(SCRIPT)


def test_licence_metadata_names_the_code_and_the_weights_terms():
    meta = metadata("lungseg")
    assert meta["License-Expression"] == "Apache-2.0 AND CC-BY-NC-SA-4.0"
    assert set(meta.get_all("License-File")) >= {"LICENSE", "lungseg/models/LICENSE.md"}
    assert "Apache License" in (REPO / "LICENSE").read_text()
    terms = (REPO / "lungseg" / "models" / "LICENSE.md").read_text()
    assert "CC BY-NC-SA 4.0" in terms and "Stirenko" in terms
    readme = (REPO / "README.md").read_text()
    card = readme[readme.index("## Bundled model") :]
    assert "CC BY-NC-SA 4.0" in card


def test_the_lock_pins_every_package_the_set_up_installs():
    """Every requirement line of the lock is ``name==version`` (markers allowed)."""
    lines = [
        line.split("#")[0].strip()
        for line in (REPO / ".lock" / "requirements.txt").read_text().splitlines()
    ]
    pins = [line for line in lines if line]
    assert len(pins) > 50
    for pin in pins:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+( ; .+)?", pin), pin
    names = {re.split(r"==", pin)[0].lower() for pin in pins}
    assert {"ray", "tensorflow", "keras", "boto3", "botocore", "moto", "tqdm"} <= names
    assert "s3fs" not in names  # pyarrow's own S3 client serves every S3 URI
