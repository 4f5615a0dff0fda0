"""Models: config, LM backbone, mixers (fused mamba_ssm and pure-PyTorch reference), init."""
