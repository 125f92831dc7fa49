"""eval.py -- mIoU of a carb.py checkpoint on a split, whole image at full resolution.

    python eval.py --data cityscapes --data-root data/cityscapes --ckpt runs/cityscapes/last.pth
    python eval.py --data synthetic --ckpt runs/synthetic/last.pth
"""
import argparse
import sys

import torch

import carb


def get_args_parser():
    p = argparse.ArgumentParser(description="Evaluate a carb.py checkpoint (per-class IoU and mIoU).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=list(carb.DEFAULTS), default="synthetic")
    p.add_argument("--data-root", help="default: the dataset's carb.py default")
    p.add_argument("--ckpt", required=True, help="a carb.py checkpoint, e.g. RUN/last.pth")
    p.add_argument("--split", default="val")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    return p


def main(args):
    device = torch.device(args.device)
    root = args.data_root or carb.DEFAULTS[args.data]["data_root"]
    # The text classifier is a buffer of the model, so no CLIP is needed to evaluate. Loaded with weights_only;
    # a missing, truncated or foreign checkpoint (another class count or backbone) is a one-line error.
    model = carb.segmenter_from_checkpoint(args.ckpt, "--ckpt").to(device)
    loader = torch.utils.data.DataLoader(carb.EvalSet(*carb.list_split(root, args.split)), batch_size=1,
                                         num_workers=args.workers)
    iou = carb.evaluate(model, loader, len(carb.CLASS_NAMES), device, desc=args.split)
    print(carb.format_table({"IoU": iou}, carb.CLASS_NAMES))
    print(f"mIoU: {carb.mean_iou(iou):.2f}")
    return iou


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except carb.CarbError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        sys.exit(2)
