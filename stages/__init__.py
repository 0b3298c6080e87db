"""One short script per DVC stage (run as `python -m stages.<name>` so a DVC experiment copy imports its own code).

DVC runs each stage with whatever `python` is first on PATH. Before any stage imports the pipeline, this checks
that that interpreter has the project's dependencies, and otherwise stops with one line that says how to fix it
(instead of a ModuleNotFoundError traceback from deep inside an import).
"""

import importlib.util
import sys

# Import names of the dependencies every stage needs before its first line of work; find_spec does not import them.
REQUIRED = ("yaml", "pydantic", "numpy", "pandas", "torch", "mlflow", "filelock")

_missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
if _missing:
    sys.exit(
        f"error: this Python ({sys.executable}) lacks lesion-synth's dependencies (no module {_missing[0]!r}); "
        "run '. .venv/bin/activate' (make install) first"
    )
