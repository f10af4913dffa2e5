"""The library behind the scripts: everything but the U-Net (model.py) and the diffusion (diffusion.py).

    plumbing/       settings and flags, the command line, runtime (device, precision, compile), files
    datasets/       the image data sets, as whole tensors
    training/       the training loop behind train_MNIST.py and what makes it resumable
    sampling.py     batched sampling and reconstruction through diffusion.py's samplers
    evaluation/     the metrics behind eval_MNIST.py and their classifier
    visualisation/  pictures, and the reverse process step by step behind vizu_MNIST.py

docs/modules.md lists every module in reading order.
"""
