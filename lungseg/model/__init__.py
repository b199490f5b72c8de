"""The U-Net, its training recipe, and what a ``.keras`` file says without Keras."""
