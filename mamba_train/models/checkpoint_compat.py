"""Adapters that let third-party autograd Functions run inside ``torch.utils.checkpoint``.

Kept free of GPU imports so the CPU tests exercise them with a Function of their own."""

from __future__ import annotations

import torch


class _CtxSavedTensorsReadOnce:
    """An autograd ``ctx`` whose ``saved_tensors`` was unpacked once, up front; every other
    attribute is the real ctx's."""

    def __init__(self, ctx):
        self._ctx = ctx
        self.saved_tensors = ctx.saved_tensors

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def saved_tensors_read_once(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """``function`` with a backward that unpacks ``ctx.saved_tensors`` exactly once.

    Non-reentrant activation checkpointing (``torch.utils.checkpoint``, what
    ``module.activation_checkpointing`` uses) allows each saved tensor to be unpacked once per
    backward; mamba_ssm 2.3.2's Mamba-3 backward reads ``ctx.saved_tensors`` twice (a ``len`` check,
    then the unpacking) and fails there with "Unpack is being triggered for a tensor that was
    already unpacked once". The subclass hands the unchanged upstream backward a ctx that holds
    the tensors already unpacked, so the kernels and the maths are exactly upstream's."""

    class ReadOnce(function):
        @staticmethod
        def backward(ctx, *grads):
            return function.backward(_CtxSavedTensorsReadOnce(ctx), *grads)

    ReadOnce.__name__ = ReadOnce.__qualname__ = f"{function.__name__}ReadOnce"
    return ReadOnce
