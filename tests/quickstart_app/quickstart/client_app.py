"""quickstart: A Flower / PyTorch app."""

import torch
from flwr.clientapp import ClientApp

from autoflip_strategy import AutoFLIPClient, EvalOutcome, TrainOutcome
from quickstart.task import Net, load_data
from quickstart.task import test as test_fn
from quickstart.task import train as train_fn

# Flower ClientApp
app = ClientApp()


def train(model, task):
    """Train the model on local data."""
    context = task.context  # the model arrives built (pruned) and loaded
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load the data
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    trainloader, _ = load_data(partition_id, num_partitions)

    # Call the training function
    train_loss = train_fn(
        model,
        trainloader,
        context.run_config["local-epochs"],
        task.config["lr"],
        device,
    )

    return TrainOutcome(len(trainloader.dataset), train_loss)


def evaluate(model, task):
    """Evaluate the model on local data."""
    context = task.context
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load the data
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    _, valloader = load_data(partition_id, num_partitions)

    # Call the evaluation function
    eval_loss, eval_acc = test_fn(
        model,
        valloader,
        device,
    )

    return EvalOutcome(len(valloader.dataset), eval_loss, eval_acc)


AutoFLIPClient(lambda context: Net(), train, evaluate).register(app)
