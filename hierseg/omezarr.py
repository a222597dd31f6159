"""Old path of :mod:`hierseg.serve.omezarr`, kept for outside code: MLflow models logged before the move run
``mlflow_model.py`` code that imports ``hierseg.pyfunc`` and ``hierseg.infer``, and users' scripts import these.

An alias, not a copy: this name IS the new module in ``sys.modules``, so monkeypatching either path patches both.
"""

import sys

from hierseg.serve import omezarr as _moved

sys.modules[__name__] = _moved
