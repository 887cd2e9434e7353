"""Put the PP-OCRv4 text detector (ch_PP-OCRv4_det_infer.onnx, 4.7 MB) next to this file.

    python examples/ppocr_det/fetch_model.py

The model ships inside the PyPI package rapidocr-onnxruntime (it is licensed separately and not kept
in this repository). Taken from the installed package when there is one; otherwise pip downloads
the 1.4.4 wheel (no dependencies, nothing installed) and the model is read out of it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODEL = "ch_PP-OCRv4_det_infer.onnx"
WHEEL = "rapidocr-onnxruntime==1.4.4"


def main() -> None:
    dest = Path(__file__).resolve().parent / MODEL
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        installed = Path(folder) / "models" / MODEL
        if installed.is_file():
            shutil.copyfile(installed, dest)
            print(f"{dest} (from the installed rapidocr_onnxruntime)")
            return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--quiet", "-d", tmp]
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"pip could not download {WHEEL}; install it (pip install {WHEEL}) and run this again.")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf, zf.open(f"rapidocr_onnxruntime/models/{MODEL}") as src:
            dest.write_bytes(src.read())
    print(f"{dest} (from the {WHEEL} wheel)")


if __name__ == "__main__":
    main()
