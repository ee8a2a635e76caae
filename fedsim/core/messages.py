"""Record keys shared by strategies and clients: the message contract's vocabulary.

Each strategy module's docstring states which of these its messages carry in which
direction; both sides import the names from here.
"""

#: ArrayRecord with model (or adapter) arrays, both directions.
ARRAYS = "arrays"
#: ConfigRecord sent down with each instruction.
CONFIG = "config"
#: MetricRecord of a reply.
METRICS = "metrics"
#: Weight of a reply (examples trained or evaluated on).
NUM_EXAMPLES = "num-examples"
#: The client's partition id, reported in every reply's metrics.
PARTITION_ID = "partition-id"
#: Round number the server injects into CONFIG.
SERVER_ROUND = "server-round"
#: Seconds the client spent on the instruction.
SECONDS = "seconds"
#: LoRA rank r of the adapters in a reply (train metrics).
LORA_RANK = "lora-rank"
#: LoRA scaling alpha / r of the adapters in a reply (train metrics).
LORA_SCALING = "lora-scaling"
#: In a sweep, the index of the experiment a message belongs to (in CONFIG).
EXPERIMENT = "fedsim-experiment"

# -- split learning (strategies/split, clients/split.py) -------------------------
#: ArrayRecord of what crosses the cut: encoded activations and gradients, labels.
CUT = "cut"
#: Name prefix (in CUT) of the encoded activations of a batch, both directions.
ACTIVATIONS = "activations"
#: Name prefix (in CUT) of the encoded gradient of a batch, both directions.
GRADIENT = "gradient"
#: Name (in CUT) of a batch's labels (SplitFed: client -> server; a causal LM's
#: are its tokenised batch, :meth:`fedsim.learn.tasks.CausalLM.targets`).
LABELS = "labels"
#: Name prefix (in CUT) of arrays that travel beside the activations uncoded
#: (a Hugging Face model's padding mask, ``context.mask``), both directions.
CONTEXT = "context"
#: Custom action: apply the gradient of batch t, reply batch t+1's activations.
SPLIT_STEP = "split_step"
#: Custom action (U-shaped): run the tail on the body's output, reply its gradient.
SPLIT_TAIL = "split_tail"
#: Metric of a split reply: batches the client runs this round.
BATCHES = "batches"
#: SCAFFOLD: the server's control variate (train down), a client's control
#: variate update (train up).
CONTROL = "control"
