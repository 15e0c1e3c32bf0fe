"""A loader worker's ms per image with the JPEG draft decode asking PIL for (W // r, H // r),
as data.CroppedViews does, against the (ceil(W / r), ceil(H / r)) it asked for before.

    python results/draft_decode.py --size 96        # 300 shapes JPEGs at ImageNet's sizes, 96 px views

Both versions run in one process on the same files, pass after pass in turn; medians of 7.
"""
import argparse
import inspect
import os
import statistics
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import data  # noqa: E402
import shapes  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="view size (px)")
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        root = os.path.join(workdir, "jpegs")
        shapes.write_shapes_folder(root, (args.images, 10))          # longer side 160-500 px, 3:4-4:3
        folder = data.load_imagefolder(root, "train")
        source = textwrap.dedent(inspect.getsource(data.CroppedViews.draw))
        before = source.replace('image.draft("RGB", (width // reduce, height // reduce))',
                                'image.draft("RGB", (-(-width // reduce), -(-height // reduce)))')
        namespace = dict(data.__dict__)
        exec(before, namespace)
        versions = {"ceil (before)": type("Before", (data.CroppedViews,), {"draw": namespace["draw"]})(folder, args.size),
                    "floor (now)": data.CroppedViews(folder, args.size)}
        times = {name: [] for name in versions}
        for _ in range(7):
            for name, views in versions.items():
                views.draws_seed = 0                                   # the same crops for both
                start = time.perf_counter()
                for i in range(len(views)):
                    views[i]
                times[name].append(1000 * (time.perf_counter() - start) / len(views))
    for name, measured in times.items():
        print(f"{name}: {statistics.median(measured):.2f} ms per image ({args.size} px views)")
    print(f"{statistics.median(times['ceil (before)']) / statistics.median(times['floor (now)']):.2f}x")


if __name__ == "__main__":
    main()
