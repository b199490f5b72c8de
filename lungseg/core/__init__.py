"""Pure helpers: arrays and pictures, metrics, quality control, settings, fixed names."""
