"""``python -m compressor.moe.generate OUTPUT_DIR "prompt" [--k K] [--tokens N] [--device cuda] [--expert-compute]``."""

from __future__ import annotations

import argparse

from compressor.moe.io import generate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Greedy generation with a converted (MoE) output folder.")
    ap.add_argument("folder", help="output folder holding model/ and moe.safetensors")
    ap.add_argument("prompt")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=None, help="experts per token (default: the saved k)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--expert-compute", action="store_true", help="compute only the selected experts")
    args = ap.parse_args(argv)
    print(generate(args.folder, args.prompt, args.tokens, args.device, args.k, args.expert_compute))


if __name__ == "__main__":
    main()
