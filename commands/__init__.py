"""The command layer: the only place argparse lives; launch.py dispatches here."""
