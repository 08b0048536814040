"""Entry point for `ray job submit`: the same options as `pathray aggregate`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/aggregate.py --store s3://bucket/store --model prov-gigapath \
            --aggregator gigapath-slide --weights hf-hub:prov-gigapath/prov-gigapath

Inside a submitted job, `ray.init()` joins the job's cluster (RAY_ADDRESS is set by Ray).
"""

import sys

from pathray.cli import main

if __name__ == "__main__":
    sys.exit(main(["aggregate", *sys.argv[1:]]))
