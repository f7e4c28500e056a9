"""The fusion losses, kept at the path the seed's users know. The implementation lives in
`core.losses`, shared with the encoder stages that train regression heads."""
from core.losses import (DEFAULT_THRESHOLDS, DEFAULT_TIER_WEIGHTS, LOSSES, focal_smape_loss,  # noqa: F401
                         get_loss, huber_smape_loss, l1_log_loss, mse_log_loss, smape_loss, smape_rows,
                         tier_weights, to_price, weighted_smape_loss)
