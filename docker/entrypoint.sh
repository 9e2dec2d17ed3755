#!/usr/bin/env bash
# Entry point of Grove's worker images.
#   worker [prefect worker options]  a Prefect process worker on $GROVE_WORK_POOL (default grove-process):
#                                    it runs the deployments of prefect.yaml from this image's checkout
#   run|validate|stages|models|...   a grove command, e.g. `run --config configs/smollm2-tone.json`
#   anything else                    run as given (a Docker work pool's worker starts flow runs this way)
set -euo pipefail
cd "${GROVE_PROJECT_DIR:-/opt/grove}"
case "${1:-worker}" in
    worker)
        shift || true
        exec prefect worker start --pool "${GROVE_WORK_POOL:-grove-process}" --type process "$@" ;;
    run|validate|stages|runs|show|gc|models|serve|deploy)
        exec grove "$@" ;;
    *)
        exec "$@" ;;
esac
