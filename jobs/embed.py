"""Entry point for `ray job submit`: the same options as `pathray embed`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/embed.py --config cluster/job.example.yaml

Inside a submitted job, `ray.init()` joins the job's cluster (RAY_ADDRESS is set by Ray).
"""

import sys

from pathray.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
