"""Entry points: the CLI, the dev runner and every process's main.

The one package that wires every layer together (engine core, workflows, tasks, the web app).
It never imports `emulators`: the dev runner starts them as processes (`python -m emulators.x`).
"""
