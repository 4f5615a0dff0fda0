"""Data/model parallel strategies: FSDP (``fsdp.py``), DeepSpeed (``deepspeed.py``), the shared
precision policy (``policy.py``), strategy-aware model building and parameter gathering
(``sharded.py``), and the CPU-process shims the tests need (``cpu_shims.py``).

Strategies (``strategy=<name>``, files in ``conf/strategy/``):

* ``ddp``: Lightning's ``DDPStrategy``; fp32 parameters, bf16 autocast under ``bf16-mixed``.
* ``fsdp``: :func:`~mamba_train.training.step.strategies.fsdp.fsdp_strategy` -- FSDP (``FullyShardedDataParallel``) wrapping each Mamba
  :class:`~mamba_train.models.lm.Block`, ``use_orig_params=True`` (so the optimizer groups go by
  parameter *name*, ``training/step/optim.py``), full or sharded checkpoints. Activation checkpointing
  is ``module.activation_checkpointing``, the same on every strategy.
* ``deepspeed_zero{1,2,3}``: :func:`~mamba_train.training.step.strategies.deepspeed.deepspeed_strategy` -- DeepSpeed ZeRO through Lightning.

Precision policy (the same numerics under every strategy): parameters, gradients and optimizer
state stay **fp32**; under ``precision=bf16-mixed`` the forward/backward run under bf16 autocast
(matmuls and convolutions in bf16, the SSM parameters A_log, D and the Δ bias used in fp32). Two
strategies would otherwise keep 16-bit *parameters* for compute:

* FSDP ``MixedPrecision(param_dtype=bf16)`` (Lightning's default for ``bf16-mixed``) keeps fp32
  *sharded masters* -- so the optimizer updates are not rounded away, the failure of 16-bit
  storage (state-spaces/mamba#6) -- but all-gathers a bf16 copy for compute. That rounds A_log,
  D and the Δ bias to 8 significant bits in every forward (A and Δ off by up to ~1-2% at their
  initial values; updates smaller than a bf16 step are invisible to the forward until they add
  up) and the gradients come out in bf16. FSDP1 casts whole units (a Block), so the SSM
  parameters cannot be exempted. Autocast already runs the matmuls in bf16, so what 16-bit
  parameters would buy is only a halved all-gather; here ``param_dtype``/``reduce_dtype``
  default to fp32 and ``param_dtype=bfloat16`` is refused unless
  ``train.allow_low_precision_params=true``.
* DeepSpeed's ``bf16`` mode casts the whole module to bf16 (fp32 copies only inside the ZeRO
  optimizer), so every forward uses bf16 A_log/D/Δ bias. Instead, ``bf16-mixed`` here turns on
  DeepSpeed's ``torch_autocast`` mode: fp32 module parameters, bf16 autocast in the engine's
  forward. Asking for DeepSpeed's own ``bf16``/``fp16`` sections is refused (same opt-out).

The init guard (``callbacks/init_guard.py``) reads the SSM parameters through
:func:`~mamba_train.training.step.strategies.sharded.gathered_parameters`, which un-shards them where a strategy sharded them (FSDP
``summon_full_params``, DeepSpeed ``GatheredParameters``); :func:`~mamba_train.training.step.strategies.sharded.build_model_for` builds the
model under ZeRO-3's partitioned init and re-runs the mamba_ssm init on gathered parameters
(``MambaLM.reset_parameters`` on partitioned, size-0 tensors would silently do nothing).
"""
