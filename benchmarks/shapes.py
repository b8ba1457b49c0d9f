"""Shapes-world checker: accuracy under image degradations at 32/48/64 px, and throughput.

    python benchmarks/shapes.py [--n 600] [--sizes 32 48 64]

For each size and degradation: the share of correct renders the checker accepts, and the share of
flawed renders (one typical mistake each) it rejects. Generated images will be blurrier and noisier
than renders; these rows say how far the verifier can be trusted on them.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image, ImageFilter

from reflectionflow.shapes.world import check_image, make_flawed, render_scene, sample_example


def jpeg(quality: int):
    def apply(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
        return Image.open(buffer).convert("RGB")

    return apply


def blur_noise(radius: float, sigma: float):
    def apply(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        if radius:
            image = image.filter(ImageFilter.GaussianBlur(radius))
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, sigma, (image.height, image.width, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    return apply


DEGRADATIONS = {
    "clean": blur_noise(0, 0),
    "jpeg q95 4:4:4": jpeg(95),
    "jpeg q75 4:2:0": jpeg(75),
    "blur 0.7": blur_noise(0.7, 0),
    "blur 1.0": blur_noise(1.0, 0),
    "blur 1.5": blur_noise(1.5, 0),
    "noise 15": blur_noise(0, 15),
    "noise 30": blur_noise(0, 30),
    "blur 1.0 + noise 15": blur_noise(1.0, 15),
    "blur 1.5 + noise 30": blur_noise(1.5, 30),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=600, help="examples per size and degradation")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64])
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    examples = []
    for _ in range(args.n):
        spec, scene = sample_example(rng)
        examples.append((spec, scene, make_flawed(spec, scene, rng)[0]))

    print(f"{args.n} prompts (all six categories), each as a correct and a flawed render")
    print(f"{'size':>4}  {'degradation':<22} {'accepts correct':>15} {'rejects flawed':>15}")
    accepted = {}
    for size in args.sizes:
        for name, degrade in DEGRADATIONS.items():
            noise = np.random.default_rng(1)
            ok = sum(
                check_image(degrade(render_scene(s, size), noise), spec).correct for spec, s, _ in examples
            )
            bad = sum(
                not check_image(degrade(render_scene(f, size), noise), spec).correct
                for spec, _, f in examples
            )
            accepted[size, name] = ok / args.n
            print(f"{size:>4}  {name:<22} {ok / args.n:>15.3f} {bad / args.n:>15.3f}")

    start = time.perf_counter()
    for spec, scene, _ in examples:
        check_image(render_scene(scene, 48), spec)
    per_second = len(examples) / (time.perf_counter() - start)
    print(f"render + check at 48 px: {per_second:.0f} images/s (one thread)")
    if 48 in args.sizes:
        ratio = accepted[48, "blur 1.0 + noise 15"] / accepted[48, "clean"]
        print(f"48 px accuracy, blur 1.0 + noise 15 vs clean: {ratio:.3f}x")


if __name__ == "__main__":
    main()
