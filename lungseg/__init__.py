"""lungseg: lung-field segmentation of chest X-rays with a Keras U-Net, as Ray jobs."""

__version__ = "0.1.0"
