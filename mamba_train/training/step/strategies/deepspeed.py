"""DeepSpeed ZeRO (stages 1-3) through Lightning, with fp32 module parameters: ``bf16-mixed``
becomes DeepSpeed's ``torch_autocast`` mode instead of its bf16 mode (which casts the module to
bf16). ``deepspeed`` itself is imported only when a strategy is built or set up."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from mamba_train.dtypes import parse_dtype
from mamba_train.training.step.strategies.cpu_shims import DeepSpeedOnCPU
from mamba_train.training.step.strategies.policy import ParallelConfigError, refuse_low_precision


class MambaDeepSpeedStrategy(DeepSpeedOnCPU, DeepSpeedStrategy):
    """DeepSpeed with fp32 module parameters (``_format_config``: Lightning's hook that turns the
    precision flag into DeepSpeed config sections; no public hook exists for it).

    ``allow_cpu`` lets the strategy run on CPU processes over gloo (DeepSpeed's CPU
    accelerator; ``cpu_shims.DeepSpeedOnCPU``); Lightning only allows CUDA. It exists for the
    CPU tests.
    """

    def __init__(self, *args, reduce_dtype: str = "float32", allow_cpu: bool = False,
                 allow_low_precision_params: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._reduce_dtype = parse_dtype(reduce_dtype, "strategy.reduce_dtype", ParallelConfigError)
        self._allow_cpu = allow_cpu
        self._allow_low_precision = allow_low_precision_params

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        # Lightning's closure has already divided the loss by accumulate_grad_batches, which is
        # also the engine's gradient_accumulation_steps: engine.backward's own division would
        # leave every gradient 1/accumulation of the DDP one (tests/test_distributed.py)
        return super().backward(closure_loss, optimizer, *args, scale_wrt_gas=False, **kwargs)

    def _format_config(self) -> None:
        precision = self.precision_plugin.precision
        if any(self.config.get(k, {}).get("enabled") for k in ("bf16", "fp16")):
            refuse_low_precision("DeepSpeed's bf16/fp16 mode (a 16-bit module)",
                                 self._allow_low_precision)
        elif precision == "bf16-mixed":
            self.config["bf16"] = {"enabled": False}  # keeps Lightning from turning it on
            self.config["torch_autocast"] = {
                "enabled": True, "dtype": "bfloat16",
                # modules whose gradients may be reduced in bf16; none by default (fp32 reduce)
                "lower_precision_safe_modules": (
                    [] if self._reduce_dtype == torch.float32
                    else ["torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv1d"]),
            }
        elif precision == "16-mixed":
            raise ParallelConfigError("DeepSpeed here supports precision=bf16-mixed or 32-true, "
                                      "not 16-mixed (fp16 needs loss scaling of 16-bit params)")
        super()._format_config()


def deepspeed_strategy(stage: int, offload_optimizer: bool = False, offload_parameters: bool = False,
                       reduce_dtype: str = "float32", allow_low_precision_params: bool = False,
                       allow_cpu: bool = False, **kwargs: Any) -> MambaDeepSpeedStrategy:
    """Lightning ``DeepSpeedStrategy`` (ZeRO ``stage`` 1, 2 or 3) with fp32 module parameters.

    ``reduce_dtype=bfloat16`` reduces the gradients of Linear/Conv1d weights in bf16 (DeepSpeed's
    ``torch_autocast`` default; the SSM parameters are never among them); fp32 by default.
    Other ``kwargs`` go to ``DeepSpeedStrategy`` (``config=`` a DeepSpeed JSON/dict, ...).
    """
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ParallelConfigError(f"strategy=deepspeed_zero{stage} needs DeepSpeed: "
                                  f"pip install deepspeed ({e})") from e
    if stage not in (1, 2, 3):
        raise ParallelConfigError(f"DeepSpeed ZeRO stage must be 1, 2 or 3, got {stage}")
    return MambaDeepSpeedStrategy(
        stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters,
        reduce_dtype=reduce_dtype, allow_cpu=allow_cpu,
        allow_low_precision_params=allow_low_precision_params, **kwargs)
