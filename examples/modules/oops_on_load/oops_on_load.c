// SPDX-License-Identifier: GPL-2.0
/*
 * oops_on_load: dereferences NULL in its init function. Shows `vmpod matrix`
 * detecting an oops from the guest's kernel log, with the VM torn down.
 */
#include <linux/module.h>

static int __init oops_init(void)
{
	int *volatile nowhere = NULL;

	pr_info("oops_on_load: about to fault\n");
	*nowhere = 1;
	return 0;
}

module_init(oops_init);
MODULE_LICENSE("GPL");
