"""The lecture notes' numbers that the models are compared with (the seed decks the project implements).

Only numbers for the data the models train on here (MNIST) are kept; the decks' CIFAR-10, OMNIGLOT and
ImageNet tables have no counterpart among the runs.

>>> BURDA_ONE_LAYER[50][1]  # IWAE, k = 50: test NLL in nats, active units
(84.78, 25)
"""

# Seed 000, "Taming VAEs" (MNIST): model -> (marginal KL, reconstruction loss -log p(x|z)), nats per image.
TAMING = {
    "vae": (1.5813, 55.8484),
    "beta-vae": (10.5938, 15.1434),
    "geco": (10.4975, 14.6269),
    "geco-iwae": (1.3640, 12.9214),
}

# Seed 001, Burda et al. Table 1 (MNIST): k -> ((VAE NLL, active units), (IWAE NLL, active units)); one stochastic
# layer, then two (their active units as (first layer, second layer)).
BURDA_ONE_LAYER = {1: ((86.76, 19), (86.76, 19)), 5: ((86.47, 20), (85.54, 22)), 50: ((86.35, 20), (84.78, 25))}
BURDA_TWO_LAYERS = {
    1: ((85.33, (16, 5)), (85.33, (16, 5))),
    5: ((85.01, (17, 5)), (83.89, (21, 5))),
    50: ((84.78, (17, 5)), (82.90, (26, 7))),
}

# Seed 001, the VLAE table (Chen et al.): test NLL of VLAE on binarised MNIST, nats per image.
VLAE_NLL = 79.03
