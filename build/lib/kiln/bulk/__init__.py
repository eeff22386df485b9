"""The bulk jobs kiln label, kiln generate and kiln eval, and the driver they share."""
