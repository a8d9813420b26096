"""Sample clips from a bundled testbed model, written the way a research repo's sample script is.

    python examples/sample_testbed.py --model flow --prompt "a red circle moving left" --seeds 10000 10001
    taocache-run examples/sample_testbed.py --model flow --prompt "a red circle moving left" \\
        --taocache configs/testbed_flow.yaml

The script knows nothing of taohooks; ``taocache-run`` attaches TaoCache through the
``testbed`` integration (see ``taohooks/testbed/integration.py``).
"""
import argparse
from pathlib import Path

import torch

from taohooks.testbed import grid, sampling
from taohooks.testbed.model import VideoDiT


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="flow", help="flow | eps | flow-lognormal, or a .safetensors path")
    parser.add_argument("--prompt", action="append", help="repeat for several prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[10000])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--out", default="out/samples.png")
    args = parser.parse_args()

    path = Path(args.model)
    if not path.suffix:
        path = Path(sampling.__file__).parent / "weights" / f"{args.model}.safetensors"
    model = VideoDiT.from_pretrained(path)
    extra = {} if args.guidance is None else {"guidance": args.guidance}
    clips = []
    for prompt in args.prompt or ["a red circle moving left"]:
        clips.append(sampling.sample(model, [prompt] * len(args.seeds), args.seeds, steps=args.steps, **extra))
        print(f"sampled {len(args.seeds)} clip(s) of {prompt!r}")
    grid.save_grid(torch.cat(clips), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
