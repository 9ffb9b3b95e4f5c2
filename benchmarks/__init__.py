"""ddpm-scale: benchmarks (everything that measures or validates rather than trains).

Each is a command: ``python -m benchmarks.<name>`` for trainer, loader, model, convergence and
gpu_check; ``benchmarks.timing`` is the one shared way they time and report.
"""
