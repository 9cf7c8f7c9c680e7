"""argparse types shared by the `anomaly-seg` subcommands (training's and the tools')."""

import argparse
from collections.abc import Callable
import re

_SIZE = re.compile(r'\s*(\d+)\s*[xX]\s*(\d+)\s*')


def parse_size(text: str, minimum: int = 1) -> tuple[int, int]:
    """'360x640' (also '360X640', spaces around the numbers) -> (360, 640).

    argparse.ArgumentTypeError unless both sides are whole numbers of at least `minimum`.
    """
    match = _SIZE.fullmatch(text)
    if not match or min(int(match[1]), int(match[2])) < minimum:
        sides = f' with both sides >= {minimum} pixels' if minimum > 1 else ''
        raise argparse.ArgumentTypeError(
            f'size must be HxW{sides}, e.g. 360x640, got {text!r}')
    return int(match[1]), int(match[2])


def size_arg(minimum: int = 1) -> Callable[[str], tuple[int, int]]:
    """An argparse `type=` for an HxW flag whose sides are at least `minimum` pixels."""
    def size(text: str) -> tuple[int, int]:
        return parse_size(text, minimum)

    return size
