"""Applications built on the card_megatron library (lingua's ``apps/``): the library never imports them."""
