"""prefect.yaml's pull step: a Grove deployment's flow run runs in the worker's own project folder.

Found on the worker when the run starts: $GROVE_PROJECT_DIR (the images set /opt/grove), else
the checkout this `flows` package is imported from. Not Prefect's set_working_directory with
"{{ $GROVE_PROJECT_DIR }}": `prefect deploy` fills `$` placeholders in from the deploying
machine's environment, so every worker, a container included, would enter the folder of the
machine the deployment was made on. Relative config paths (configs/...) resolve from here.
"""

from __future__ import annotations

import os
from pathlib import Path


def enter_project_dir() -> dict[str, str]:
    directory = os.environ.get("GROVE_PROJECT_DIR")
    if not directory:
        checkout = Path(__file__).resolve().parents[1]
        if not (checkout / "prefect.yaml").is_file():
            raise RuntimeError(f"GROVE_PROJECT_DIR is not set and {checkout} is not a Grove checkout: set it, "
                               f"on the worker, to the folder holding Grove's configs and prefect.yaml")
        directory = str(checkout)
    os.chdir(directory)
    return {"directory": directory}
