#!/bin/sh
test -d /sys/class/vmpod_api_break && echo PASS
