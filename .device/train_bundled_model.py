"""How the bundled model was trained: lungseg's recipe on one GPU, Keras 3 on JAX, no Ray.

The GPU machine lent to this project had JAX but neither Ray nor TensorFlow, so this script runs
the training job's pieces in one process: `build_unet`, `bce_dice_loss`, `imaging.augment`,
`model.cosine_learning_rate`, early stopping on the validation Dice after
`imaging.postprocess`, and the split in `lungseg/models/split.json`.

    python .device/train_bundled_model.py prepare ../shared/data/cxr-lungs   # here: 256x256 npz
    python .device/train_bundled_model.py train 150 60 300                   # there: epochs,
                                                                             # patience, seconds

`train` writes the best epoch's weights to $OUT/best{0..3}.npz (split in four to stay under the
device tool's per-file limit) and history.csv; `assemble` turns them into the bundled .keras:

    python .device/train_bundled_model.py assemble OUT_DIR lungseg/models/lungseg-unet256.keras
"""

import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
import keras
import numpy as np

from lungseg import imaging
from lungseg.config import BUNDLED_SPLIT
from lungseg.metrics import confusion
from lungseg.model import bce_dice_loss, build_unet, cosine_learning_rate

DATA = ".gpu/cxr256.npz"
BATCH, LR, PARTS = 16, 1e-3, 4


def prepare(root: str) -> None:
    """Preprocess every pair as the pipeline does (load, normalise, resize) into one npz."""
    ids = sorted(p.stem for p in Path(root, "images").glob("*.png"))
    images, masks = [], []
    for i in ids:
        image = imaging.load_image(Path(root, "images", f"{i}.png").read_bytes(), i)
        mask = imaging.load_mask([Path(root, "masks", f"{i}.png").read_bytes()], [i])
        images.append(imaging.resize_image(image, 256))
        masks.append(imaging.resize_mask(mask, 256, 256))
    Path(DATA).parent.mkdir(exist_ok=True)
    np.savez_compressed(DATA, ids=np.array(ids), images=np.stack(images), masks=np.stack(masks))


class Batches(keras.utils.PyDataset):
    """One epoch of augmented training batches, in a seeded random order."""

    def __init__(self, images, masks, order, seed):
        super().__init__()
        self.images, self.masks = images, masks
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(order)

    def __len__(self):
        return len(self.order) // BATCH

    def __getitem__(self, k):
        pairs = [
            imaging.augment(self.images[n], self.masks[n], self.rng)
            for n in self.order[k * BATCH : (k + 1) * BATCH]
        ]
        x = np.stack([p[0] for p in pairs])[..., None].astype("float32")
        return x, np.stack([p[1] for p in pairs])[..., None].astype("float32")


def train(epochs: int, patience: int, budget: float) -> None:
    out = os.environ.get("OUT", "/tmp/out")
    data = np.load(DATA)
    ids = data["ids"].tolist()
    index = {i: n for n, i in enumerate(ids)}
    split = json.loads(Path(BUNDLED_SPLIT).read_text())
    train_idx = np.array([index[i] for i in split["train"]])
    val_idx = np.array([index[i] for i in split["val"]])
    images, masks = data["images"], data["masks"]
    model = build_unet()
    model.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss=lambda y, p: keras.ops.mean(bce_dice_loss(y, p)),
        jit_compile=True,
    )
    x_val = images[val_idx][..., None].astype("float32")
    best, best_epoch, history, started = -1.0, 0, [], time.time()
    for epoch in range(epochs):
        model.optimizer.learning_rate.assign(cosine_learning_rate(LR, epoch, epochs))
        fit = model.fit(Batches(images, masks, train_idx, epoch), epochs=1, verbose=0)
        probability = model.predict(x_val, batch_size=64, verbose=0)[..., 0]
        dice = [
            confusion(imaging.postprocess(p), masks[n]).dice
            for p, n in zip(probability, val_idx, strict=True)
        ]
        row = {"epoch": epoch + 1, "loss": float(fit.history["loss"][0])}
        row["val_dice"] = float(np.mean(dice))
        for prefix in ("MCUCXR", "CHNCXR"):
            own = [d for d, n in zip(dice, val_idx, strict=True) if ids[n].startswith(prefix)]
            row[f"val_dice_{prefix}"] = float(np.mean(own))
        row["seconds"] = round(time.time() - started, 1)
        history.append(row)
        print(row, flush=True)
        if row["val_dice"] > best:
            best, best_epoch = row["val_dice"], epoch + 1
            weights = model.get_weights()
            for part in range(PARTS):
                np.savez(os.path.join(out, f"best{part}.npz"), *weights[part::PARTS])
        if epoch + 1 - best_epoch >= patience or time.time() - started > budget:
            break
    with open(os.path.join(out, "history.csv"), "w") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    print(f"best epoch {best_epoch}: validation Dice {best:.4f}")


def assemble(folder: str, target: str) -> None:
    """The best weights from ``folder`` into a .keras file without optimizer state."""
    model = build_unet()
    weights: list = [None] * len(model.get_weights())
    for part in range(PARTS):
        with np.load(os.path.join(folder, f"best{part}.npz")) as arrays:
            for k in range(len(arrays.files)):
                weights[part + PARTS * k] = arrays[f"arr_{k}"]
    model.set_weights(weights)
    model.save(target)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "prepare":
        prepare(args[0])
    elif command == "train":
        train(int(args[0]), int(args[1]), float(args[2]))
    else:
        assemble(args[0], args[1])
