"""The collapse rule, for the sweep tables and plots: one implementation, `facenet_jax.collapse`
(the train loop warns with it too), re-exported here for the sweep modules."""

from facenet_jax.collapse import (COLLAPSE_LOSS_RTOL, COLLAPSE_RADIUS,  # noqa: F401
                                  COLLAPSE_SPREAD_OF_MARGIN, COLLAPSE_WINDOW, collapse_spread,
                                  is_collapsed)
