"""Names shared by the server and client sides of the message protocol.

Keeping them in one place lets a reader follow one round: the strategy builds
a message with these keys, the client helper reads them, and the reply comes
back under the same names.
"""

EXPLORE = "query.explore"  # stage 0: θ₀ out, local guidance matrix back
DESCRIBE = "query.describe"  # handshake: which partition does a node hold

ARRAYS = "arrays"  # model tensors (codec layout)
MASK = "mask"  # packed mask, only when the receiver lacks this version
GUIDANCE = "guidance"  # exploration reply: D_k per prunable weight
CONFIG = "config"
METRICS = "metrics"

# config keys (server -> client)
ROUND = "server-round"
MASK_VERSION = "mask-version"  # 0 means "keep everything" and is never sent
STRUCTURE = "structure"  # JSON of the ModelStructure, sent with the mask
TRANSPORT = "transport"
SEED = "seed"
EPOCHS = "epochs"
PATIENCE = "patience"
PRECISION = "guidance-precision"

# metric keys (client -> server)
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
EPOCHS_RUN = "epochs-run"
