"""ament_python packaging of anomaly_seg (also a plain pip package for training machines)."""

from glob import glob

from setuptools import find_packages, setup

package_name = 'anomaly_seg'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(include=['anomaly_seg_node', 'anomaly_seg_node.*',
                                    'training', 'training.*']),
    package_data={'training': ['configs/*.yaml']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml')),
        # Artifacts: sidecars, model cards and their weights (NAME.onnx, NAME.pt2 when shipped).
        ('share/' + package_name + '/models',
         sorted(glob('models/*.json') + glob('models/*.onnx') + glob('models/*.pt2'))),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='anomaly_seg maintainers',
    maintainer_email='anomaly-seg@example.com',
    description='Open-set semantic segmentation with a dense anomaly score for vehicle cameras.',
    license='Apache-2.0',
    python_requires='>=3.10',
    extras_require={'tensorrt': ['torch-tensorrt==2.14.*']},
    entry_points={
        'console_scripts': [
            'anomaly_seg_node = anomaly_seg_node.node:main',
            'anomaly-seg = anomaly_seg_node.cli:main',
        ],
    },
)
