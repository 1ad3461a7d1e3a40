"""`mta finetune` as a script, for launchers that take a module or a file (`accelerate launch -m examples.finetune`).

    python -m examples.finetune --tiny --data notes.txt --output tiny-mta
    accelerate launch --config_file examples/accelerate_fsdp.yaml -m examples.finetune --model DIR --data ... \\
        --output ...
"""

import sys

from mta.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
