"""`python -m llmft` with TRL's own fused LM head under train.overlap_steps: `hidden[mask]` makes the CPU wait for the
GPU at every step's forward, as before the seventh session. The same-call reference for what llmft's label-index head
(llmft/overlap.py) saves: benchmarks/phase16.sh's *_headsync variants run the stage through this.

    LAUNCH="python3 benchmarks/head_sync.py" bash benchmarks/gpu.sh llmft NAME key=value ...
"""
import sys

from llmft.__main__ import main
from llmft.overlap import OverlapSFTTrainer

OverlapSFTTrainer.indexed_head = False
sys.exit(main())
