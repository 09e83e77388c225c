"""PTransforms and DoFns of the DICOM storage pipeline, one concern per module."""
