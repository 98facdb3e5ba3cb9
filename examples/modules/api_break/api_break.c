// SPDX-License-Identifier: GPL-2.0
/*
 * api_break: builds on 6.1, not on 6.4+ where class_create() lost its owner
 * argument. Shows `vmpod matrix` reporting a per-kernel build failure.
 */
#include <linux/device.h>
#include <linux/module.h>

static struct class *cls;

static int __init api_break_init(void)
{
	cls = class_create(THIS_MODULE, "vmpod_api_break");
	return PTR_ERR_OR_ZERO(cls);
}

static void __exit api_break_exit(void)
{
	class_destroy(cls);
}

module_init(api_break_init);
module_exit(api_break_exit);
MODULE_LICENSE("GPL");
