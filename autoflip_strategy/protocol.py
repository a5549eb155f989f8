"""Names shared by the server and client sides of the message protocol.

Keeping them in one place lets a reader follow one round: the strategy builds
a message with these keys, the client helper reads them, and the reply comes
back under the same names.

A request keeps the user's things and AutoFLIP's apart: the user's config
travels under the strategy's ``configrecord_key`` (Flower's ``"config"``) with
nothing of ours in it but Flower's own ``server-round``; the compressed model,
the mask and AutoFLIP's settings travel under the ``autoflip.*`` keys below.
Under the strategy's ``arrayrecord_key`` (Flower's ``"arrays"``) a request
carries only :data:`PLAIN_HANDLER_HINT`, so a plain Flower handler that tries
to load it fails with an error that says what to do.
"""

EXPLORE = "query.explore"  # stage 0: θ₀ out, local guidance matrix back
DESCRIBE = "query.describe"  # handshake: which partition does a node hold

# request records (server -> client)
MODEL = "autoflip.model"  # model tensors (codec layout)
MASK = "autoflip.mask"  # packed mask, only when the receiver lacks this version
SETTINGS = "autoflip.config"  # AutoFLIP's own config keys (below), never shown to the user's functions
PLAIN_HANDLER_HINT = ("autoflip: this handler cannot read AutoFLIP's compressed model; register "
                      "AutoFLIPClient(model_fn, train_fn, evaluate_fn) on the ClientApp instead of your own "
                      "@app.train()/@app.evaluate() (see docs/adopting.md)")

CONFIG = "config"  # Flower's default configrecord_key: the user's config (and "server-round")

# reply records (client -> server), Flower's names
ARRAYS = "arrays"  # trained model tensors (codec layout)
GUIDANCE = "guidance"  # exploration reply: D_k per prunable weight
METRICS = "metrics"

# AutoFLIP config keys (server -> client, inside SETTINGS)
ROUND = "server-round"  # also in the user's config, as Flower's FedAvg sends it
MASK_VERSION = "mask-version"  # 0 means "keep everything" and is never sent
STRUCTURE = "structure"  # JSON of the ModelStructure, sent with the mask
TRANSPORT = "transport"
SEED = "seed"
EPOCHS = "epochs"
PATIENCE = "patience"
PRECISION = "guidance-precision"
EXPLORE_KIND = "explore-kind"  # what an explorer returns (scoring.Method.explore_kind); absent means "guidance"
SUPERMASK = "supermask"  # clients train sign scores and reply with sign bits (HideNseek, signs.py); absent: False
MODEL_CODEC = "model-codec"  # "signs": MODEL holds a sign payload (signs.py); absent: "values" (codec.py)
VALUE_PRECISION = "value-precision"  # model values on the wire (quantise.py); absent means float32
CONFIG_KEY = "config-key"  # where the user's config is in this message
WEIGHT_KEY = "weighted-by-key"  # the metric that carries the example count

# metric keys (client -> server), Flower's naming
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train_loss"
TRAIN_SECONDS = "train_seconds"
EPOCHS_RUN = "epochs_run"
EVAL_LOSS = "eval_loss"
EVAL_ACC = "eval_acc"
