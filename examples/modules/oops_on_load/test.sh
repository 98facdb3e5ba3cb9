#!/bin/sh
echo should not get here
