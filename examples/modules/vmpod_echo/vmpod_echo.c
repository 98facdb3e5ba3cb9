// SPDX-License-Identifier: GPL-2.0
/*
 * vmpod_echo: a misc character device that hands back what was last written.
 * The example module of `vmpod matrix` (see test.sh beside it).
 */
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/uaccess.h>

#define ECHO_MAX 4096

static char buf[ECHO_MAX];
static size_t len;
static DEFINE_MUTEX(lock);
static unsigned int writes;
module_param(writes, uint, 0444);
MODULE_PARM_DESC(writes, "number of writes so far (read-only)");

static ssize_t echo_read(struct file *f, char __user *ubuf, size_t n, loff_t *pos)
{
	ssize_t ret;

	mutex_lock(&lock);
	ret = simple_read_from_buffer(ubuf, n, pos, buf, len);
	mutex_unlock(&lock);
	return ret;
}

static ssize_t echo_write(struct file *f, const char __user *ubuf, size_t n, loff_t *pos)
{
	if (n > ECHO_MAX)
		return -EFBIG;
	mutex_lock(&lock);
	if (copy_from_user(buf, ubuf, n)) {
		mutex_unlock(&lock);
		return -EFAULT;
	}
	len = n;
	writes++;
	mutex_unlock(&lock);
	return n;
}

static const struct file_operations echo_fops = {
	.owner = THIS_MODULE,
	.read = echo_read,
	.write = echo_write,
	.llseek = default_llseek,
};

static struct miscdevice echo_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "vmpod_echo",
	.fops = &echo_fops,
	.mode = 0666,
};

static int __init echo_init(void)
{
	pr_info("vmpod_echo: loaded\n");
	return misc_register(&echo_dev);
}

static void __exit echo_exit(void)
{
	misc_deregister(&echo_dev);
	pr_info("vmpod_echo: unloaded after %u writes\n", writes);
}

module_init(echo_init);
module_exit(echo_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vmpod example: echo character device");
