"""Validate the GPU paths in one command and write one JSON report: ``python -m benchmarks.gpu_check``.

    python -m benchmarks.gpu_check                          # a GPU: about 8 minutes, writes gpu_check.json
    python -m benchmarks.gpu_check --batches 8,16,32,64 --budget-s 900 --out /shared/gpu_check.json
    python -m benchmarks.gpu_check --cpu                    # the reduced CPU mode CI runs (tiny model, < 1 min)

Sections, in this order, each timed, each allowed to fail or be skipped without stopping
the others (the report says which and why; the exit code is 1 if any failed):

  environment     torch, CUDA, cuDNN, NCCL, the device and its dense bf16 peak (from its name)
  step            the trainer's own step (bf16 autocast, torch.compile, channels_last on a GPU)
                  at several per-GPU batches: images/s, the split fwd+bwd / optimizer / EMA,
                  peak memory, compile time, graph breaks, MFU (FLOPs counted by models.flops)
  diffusers       the same step for diffusers' UNet2DModel of the same (paper) configuration,
                  side by side with ours, as a ratio (skipped with a note if diffusers is missing)
  ddp_nccl        torchrun, one process: DDP + torch.compile + NCCL (gloo on CPU) with no_sync
                  accumulation, the trainer's step, its collectives; no "Grad strides" warning
  resume          the trainer under torchrun: a checkpoint mid-run, resumed, compared with a
                  straight run (bit-exact, or else measured against the GPU's run-to-run noise)
  decode          nvJPEG (batched, on the device) vs one CPU core of libjpeg-turbo, images/s
  ema_checkpoint  the EMA update, the checkpoint's stall of the step, DDP's gradient hand-off, in ms
  gpu_tests       the ``gpu``-marked tests (CPU mode: collected only, so they cannot rot)

Whatever does not fit the time budget (--budget-s) is skipped and reported as such. Nothing
is downloaded: diffusers, if wanted, is carried as a wheel (see the README).
"""
