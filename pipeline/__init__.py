"""DICOM storage pipeline: entity folders -> study archives + metadata rows."""
__version__ = "0.1.0"
