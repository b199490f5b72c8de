"""Where jobs read and write (local and S3), and the catalog of images and masks there."""
