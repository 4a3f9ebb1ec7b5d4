"""The paper's method and nothing else: lattice, noise, targets, diffusion, CSPNet, objective."""
