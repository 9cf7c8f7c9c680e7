"""Markers: `gpu` tests skip without CUDA, `ros` tests skip without rclpy."""

import importlib.util

import pytest


def _has_cuda() -> bool:
    if importlib.util.find_spec('torch') is None:
        return False
    import torch
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_ros = importlib.util.find_spec('rclpy') is not None
    has_cuda = None
    for item in items:
        if 'ros' in item.keywords and not has_ros:
            item.add_marker(pytest.mark.skip(reason='needs ROS 2 (rclpy not importable)'))
        if 'gpu' in item.keywords:
            if has_cuda is None:
                has_cuda = _has_cuda()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason='needs a CUDA device'))
