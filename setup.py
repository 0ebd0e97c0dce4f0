"""bmd_d2: vertebral bone mineral density from routine CT, as a Detectron2 project.

Detectron2 itself is not a dependency here: it is not on PyPI. Install it first (``tools/bootstrap.sh`` does, see
README) — from source for a CUDA build, or as v0.6's pure-Python package.
"""
from setuptools import find_packages, setup

setup(
    name="bmd_d2",
    version="0.1.0",
    description="Vertebral BMD from CT: MFEFPN + multi-scale fusion Mask R-CNN with a stacked-erosion BMD head",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(exclude=("tests", "tests.*", "tools", "configs", "datasets")),
    include_package_data=True,
    install_requires=[
        "numpy>=1.22",
        "scipy>=1.9",
        "spekpy>=2.5",  # phantoms/physics.py: X-ray tube spectra (tables ship in the wheel, ~215 MB installed)
        "xraydb>=4.5",  # phantoms/physics.py: mass attenuation coefficients (SQLite database ships in the wheel)
        "torch>=1.10",
        "torchvision>=0.11",
        "pydicom>=2.4",
        "pylibjpeg>=2.0",  # pixel-data plugins below: JPEG, JPEG-LS, JPEG 2000, RLE
        "pylibjpeg-libjpeg>=2.0",
        "pylibjpeg-openjpeg>=2.0",
        "pylibjpeg-rle>=2.0",
        "pyjpegls>=1.2",
        "imagecodecs>=2024.1.1",  # fast decoders that release the GIL (slices decoded on parallel threads)
        "nibabel>=4.0",
        "highdicom>=0.22",
        "pynetdicom>=2.0",  # bmd-serve: the DICOM node (Storage SCP, C-STORE SCU)
        "pycocotools>=2.0.2",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "matplotlib>=3.5",
        "tqdm>=4.29",
        "ray>=2.40",  # bmd-measure --batch: the batch engine (local instance or a cluster)
        "pyarrow>=14",  # the batch tables as Parquet
        "PyYAML>=5.1",
        "opencv-python-headless>=4.5",
        "Pillow>=7.1",
    ],
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "import-linter>=2.1"]},
    entry_points={
        "console_scripts": [
            "bmd-measure=bmd_d2.cli.measure:main",
            "bmd-make-phantoms=bmd_d2.phantoms.cli:main",
            "bmd-serve=bmd_d2.cli.serve:main",
        ]
    },
)
