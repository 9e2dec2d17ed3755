#!/usr/bin/env bash
# Entry point of Grove's worker images.
#   worker [prefect worker options]  a Prefect process worker on $GROVE_WORK_POOL (default grove-process):
#                                    it runs the deployments of prefect.yaml from this image's checkout
#   run|validate|stages|export|...   a grove command (every one `grove -h` lists), e.g.
#                                    `run --config configs/smollm2-tone.json`
#   anything else                    run as given (a Docker work pool's worker starts flow runs this way)
set -euo pipefail
cd "${GROVE_PROJECT_DIR:-/opt/grove}"
case "${1:-worker}" in
    worker)
        shift || true
        exec prefect worker start --pool "${GROVE_WORK_POOL:-grove-process}" --type process "$@" ;;
    validate|stages|run|predict|models|runs|show|export|gc|diff|serve|deploy|server)
        exec grove "$@" ;;
    *)
        exec "$@" ;;
esac
