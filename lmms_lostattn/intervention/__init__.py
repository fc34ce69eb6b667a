"""Running an intervention on a live model: prompt tracking, row and key selection, the edited attention kernel,
patterns and draws, image priors, noise modes, and ``intervene``, which composes them in one scope."""
