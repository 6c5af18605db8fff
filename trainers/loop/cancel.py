"""Cancel, as the library knows it. A host (nodes/host.py for ComfyUI's Cancel button, the headless runner) raises
:class:`Interrupted` from a callback between steps; the training loop then keeps the step that finished as a
checkpoint and marks the run cancelled. ``KeyboardInterrupt`` counts the same. No torch here, so that nodes/host.py
can raise it without importing torch when the pack loads."""
from __future__ import annotations


class Interrupted(Exception):
    """Cancel was pressed: raised from a callback (a progress bar), between steps."""


#: what the loop takes for a cancel rather than a failure
CANCELS = (KeyboardInterrupt, Interrupted)
