"""`python -m nanoray.scaling predict --run-dir runs/miniseries [--core 0.2565] [--bpb 0.8]`: what a target
takes (nanoray.scaling.predict)."""

from nanoray.scaling.predict import main

main()
